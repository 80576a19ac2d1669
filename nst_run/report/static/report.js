
(function(){
"use strict";
var D=JSON.parse(document.getElementById("nst-data").textContent);
var grid=document.getElementById("cards"),cards={};
Array.prototype.forEach.call(grid.querySelectorAll("article.card"),function(c){cards[c.getAttribute("data-i")]=c;});
function $(id){return document.getElementById(id);}
var dir=1,empty=document.createElement("p");empty.className="empty";empty.textContent="No row matches these filters.";
function num(v){var x=parseFloat(v);return isFinite(x)?x:null;}
function key(r,k){
  if(k.slice(0,2)==="p:"){var n=k.slice(2);return (r.pn&&n in r.pn)?r.pn[n]:(r.p&&r.p[n]!==undefined?r.p[n]:null);}
  return r[k]===undefined?null:r[k];
}
function cmp(a,b,k){
  var x=key(a,k),y=key(b,k);
  if(x===null||x==="")return (y===null||y==="")?a.i-b.i:1;
  if(y===null||y==="")return -1;
  var c=(typeof x==="number"&&typeof y==="number")?x-y:String(x).localeCompare(String(y),undefined,{numeric:true});
  return c===0?a.i-b.i:c*dir;
}
function apply(){
  var q=$("f-q").value.trim().toLowerCase(),st=$("f-status").value,sy=$("f-style").value,
      pv=$("f-param")?$("f-param").value:"",ve=$("f-verdict").value,msd=num($("f-sd").value),ml=num($("f-loss").value),
      k=$("sort").value,pf=pv?JSON.parse(pv):null,shown=0;
  var order=D.records.slice().sort(function(a,b){return cmp(a,b,k);});
  order.forEach(function(r){
    var ok=(!q||r.q.indexOf(q)>=0)&&(!st||r.status===st)&&(!sy||r.style===sy)&&(!ve||r.verdict===ve)&&
      (!pf||(r.p&&r.p[pf[0]]===pf[1]))&&(msd===null||(r.sd!==null&&r.sd<=msd))&&(ml===null||(r.loss!==null&&r.loss<=ml));
    var c=cards[r.i];c.hidden=!ok;if(ok)shown++;grid.appendChild(c);
  });
  if(!shown)grid.appendChild(empty);else if(empty.parentNode)empty.parentNode.removeChild(empty);
  $("shown").textContent=shown+" of "+D.records.length+" rows shown";
}
["f-q","f-status","f-style","f-param","f-verdict","f-sd","f-loss","sort"].forEach(function(id){
  var el=$(id);if(el){el.addEventListener("input",apply);el.addEventListener("change",apply);}
});
$("sort-dir").addEventListener("click",function(){dir=-dir;this.textContent=dir>0?"\u25B2":"\u25BC";apply();});
/* Marks made on this page, kept in this browser, saved as a file for `nst review RUN --from-file FILE`. */
var store={},skey="nst-review:"+D.run;
try{store=JSON.parse(window.localStorage.getItem(skey)||"{}")||{};}catch(err){store={};}
function save(){try{window.localStorage.setItem(skey,JSON.stringify(store));}catch(err){}}
function paint(){
  Array.prototype.forEach.call(grid.querySelectorAll("footer .mark button"),function(b){
    var m=store[b.getAttribute("data-item")],on=!!m&&m.decision===b.getAttribute("data-act");
    b.classList.toggle("on",on);b.setAttribute("aria-pressed",on?"true":"false");
  });
  Object.keys(cards).forEach(function(i){
    var c=cards[i],b=c.querySelector("footer .mark button"),m=b&&store[b.getAttribute("data-item")];
    c.classList.toggle("marked-keep",!!m&&m.decision==="keep");c.classList.toggle("marked-reject",!!m&&m.decision==="reject");
  });
  var n=Object.keys(store).length;$("pending").hidden=n===0;$("pending-n").textContent=n+(n===1?" decision":" decisions");
}
grid.addEventListener("click",function(ev){
  var b=ev.target.closest?ev.target.closest("button[data-act]"):null;if(!b)return;
  var item=b.getAttribute("data-item"),act=b.getAttribute("data-act");
  if(store[item]&&store[item].decision===act)delete store[item];else store[item]={item_id:item,id:b.getAttribute("data-id"),decision:act};
  save();paint();
});
try{$("reviewer").value=window.localStorage.getItem("nst-reviewer")||"";}catch(err){}
function payload(){
  var who=$("reviewer").value.trim();try{window.localStorage.setItem("nst-reviewer",who);}catch(err){}
  return {format:D.format,run:D.run,run_uri:D.run_uri,reviewer:who,decisions:Object.keys(store).map(function(k){return store[k];})};
}
$("save").addEventListener("click",function(){
  var p=payload();if(!p.reviewer){$("reviewer").focus();return;}
  var blob=new Blob([JSON.stringify(p,null,2)],{type:"application/json"}),a=document.createElement("a");
  a.href=URL.createObjectURL(blob);a.download="decisions-"+D.run+".json";document.body.appendChild(a);a.click();
  setTimeout(function(){URL.revokeObjectURL(a.href);a.remove();},1000);
});
$("clear").addEventListener("click",function(){store={};save();paint();});
apply();paint();
})();
